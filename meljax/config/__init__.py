"""The one config path: field declarations (``schema``) and the typed settings built once at
the command boundary (``settings``)."""
