"""What runs a worker process: the engine kinds Tandem's router drives (Tandem's own engine, vLLM)."""
