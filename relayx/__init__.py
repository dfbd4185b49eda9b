"""
relayx: a clustered backup MX and mail spooler on Twisted and Redis.
"""

__version__ = "0.1.0"
