"""The sender: submit jobs to the job servers, route each by its unique key, never lose one."""
