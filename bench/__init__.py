"""
relayx's benchmarks and the tools they share.
"""
