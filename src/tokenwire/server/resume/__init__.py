"""Resume: a generation outlives its connection, and (with a shared journal) its replica.

journal.py keeps each generation's numbered messages and who delivers them; record.py what a shared journal keeps
beside them; redis_journal.py the journal every replica shares, in Redis; service.py (:class:`Resumes`) the one
place a door asks to resume, hand over, abandon or take over a generation.
"""
