"""
Operating relayx: the admin HTTP API, the control panel, metrics and health
pages, and the command-line tools. Reads and changes go through the queue's
interfaces; nothing here is on the mail path.
"""
