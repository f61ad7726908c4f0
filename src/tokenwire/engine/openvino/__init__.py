"""The OpenVINO engine: OpenVINO GenAI's continuous-batching pipeline in a worker process (the default on CPU)."""
