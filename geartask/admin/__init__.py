"""The ``manage`` command (also the old manage_client.py): the fleet's admin API (geartask.fleet), the outcomes
store's commands and the dashboard, as one command line."""
