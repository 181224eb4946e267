"""The web dashboard (manage_client.py dashboard): the fleet at a glance, actions, /metrics."""
