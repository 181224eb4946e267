"""Periodic jobs: schedules from config and plugins, sent by any number of schedulers, each slot once."""
