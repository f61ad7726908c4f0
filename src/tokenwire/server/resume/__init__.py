"""Resume: a generation outlives its connection, and (with a shared journal) its replica.

log.py keeps a stream's numbered messages; journal.py a generation as this process serves it (who delivers it,
how far its reader is); record.py what a shared journal keeps beside the messages; redis_journal.py the journal
every replica shares, in Redis, and follow.py its follower; service.py (:class:`Resumes`) the one place a door
asks to resume, hand over, abandon or take over a generation.
"""
