"""`stratus report`: a run (or several, overlaid) as one offline HTML page and a PNG."""
