"""``placerank serve``: the localization service (FastAPI under uvicorn) and its web page.

- :mod:`.service`: the read-only database, model, index and re-ranker, loaded once; the jobs
- :mod:`.worker`: the one inference worker behind a bounded queue; the thumbnail cache
- :mod:`.uploads`: checks of uploaded photos (413 / 415 / 422)
- :mod:`.app`: the FastAPI app (API v1, the page, /docs); :mod:`.guard`: size limit, headers, stats
- :mod:`.server`: uvicorn, the startup line, clean SIGINT / SIGTERM; ``static/``: the page

See docs/serve.md. Nothing below this stage imports it.
"""
