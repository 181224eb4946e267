"""An example plugin, written by `geartask init`: a task for the workers, jobs for the sender.

    geartask worker --name w1            # serves example.hello (and the shell task)
    geartask send plugin example         # sends this plugin's jobs and prints the results
"""

from geartask import hookimpl


def hello(job):
    """The job's data is JSON (or text); what the task returns is the job's result."""
    name = job.data.get("name", "world") if isinstance(job.data, dict) else str(job.data)
    return {"greeting": f"hello, {name}", "attempt": job.attempt}


@hookimpl
def geartask_tasks():
    return {"example.hello": hello}


@hookimpl
def geartask_jobs():
    yield {"task": "example.hello", "data": {"name": "geartask"}}
    yield {"task": "example.hello", "data": "you", "priority": "high"}
