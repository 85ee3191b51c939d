# status.pyx has no Python-level API: it turns kernel status codes into exceptions.
