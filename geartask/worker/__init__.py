"""The worker runner: threads that grab jobs from every server and run plugin tasks and the shell task."""
