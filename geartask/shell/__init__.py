"""The built-in ``shell`` task and veryeasyprocess, the timeout-and-kill subprocess helper."""
