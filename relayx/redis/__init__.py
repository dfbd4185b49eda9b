"""
Redis plumbing shared by the queue and the checks: connections (standalone,
Sentinel), the embedded ``redis-server``, and loading Lua scripts.
"""
