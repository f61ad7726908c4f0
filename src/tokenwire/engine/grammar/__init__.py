"""Structured output for engines whose grammar backend takes a grammar text (OpenVINO GenAI's EBNF): a JSON
Schema compiled to a compact grammar (schema.py, regex.py, as data: bnf.py), and the grammar of what may follow a
text already generated (residual.py), so that a request re-admitted mid-document goes on where its text is."""
