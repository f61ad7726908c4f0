"""Reading requests and answering errors alike at every door: request fields to sampling parameters and chat
messages (params.py), strict JSON (strictjson.py), tool calls (tools.py), the wire's error codes and the one error
type (errors.py), and an error as the HTTP APIs answer it (http_errors.py)."""
