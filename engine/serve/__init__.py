"""The HTTP search service over a resident index (`engine serve`) and its client (`engine.Client`).

app.py: the ASGI app (endpoints, validation at the edge); batching.py: concurrent requests scanned as one
query block; requests.py: request bodies read within a size limit and parsed as data; client.py: the Python
client. The index underneath (engine.index.Index) never knows about HTTP.
"""
