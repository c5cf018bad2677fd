"""`stratus plan`: a hardware catalog, an analytical cost model, a layout search and a failure
model, from first principles and public figures. Imports no torch: it runs anywhere."""
