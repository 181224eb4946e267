"""The benchmark's task for geartask workers: return the input reversed (W1-W3, W5)."""

from geartask import hookimpl


def reverse(job):
    return str(job.data)[::-1]


@hookimpl
def geartask_tasks():
    return {"bench.reverse": reverse}
