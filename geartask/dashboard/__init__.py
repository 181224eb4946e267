"""The web dashboard (geartask manage dashboard): the fleet at a glance, actions, /metrics."""
