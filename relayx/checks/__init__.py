"""
Checks before the queue: whether a recipient is ours, and the filter chain
(DNS lists, SPF, greylisting, rate limits, rspamd). Each returns a verdict;
the SMTP protocol turns it into a reply.
"""
