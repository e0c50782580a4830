"""The subscription engine: reader, handler workers, acks, retries, dead letters.

``subscription`` reads (history, ``>`` batches, own-pending checks), ``runner``
runs handlers, ``acks`` batches XACKs, ``retries`` re-claims failed entries
after their backoff, ``deadletters`` writes dead letters, ``held`` owns what
this process holds, ``options`` the frozen settings, ``handle`` the one handle
type of every kind of subscription.
"""
