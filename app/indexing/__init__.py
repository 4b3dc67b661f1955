"""Putting images into the collection: the content-addressed store of originals (:mod:`.store`), the all-or-nothing
write of a batch and the delete of one image (:mod:`.write`), the uploads of the API and web UI (:mod:`.uploads`),
and the bulk pipeline (:mod:`.pipeline`) with its decode workers (:mod:`.worker`)."""
