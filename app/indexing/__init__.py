"""Putting images into the collection: the content-addressed store of originals (:mod:`.store`), the all-or-nothing
write of a batch (:mod:`.write`), and the bulk pipeline (:mod:`.pipeline`) with its decode workers (:mod:`.worker`)."""
