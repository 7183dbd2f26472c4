"""The embedded ``hf`` engine: a transformers model behind SGLang's HTTP API, run as its own process.

``python -m megarl.rollout.embedded.server`` (:mod:`~megarl.rollout.embedded.server`) serves the
endpoints the client uses on FastAPI + uvicorn; :mod:`~megarl.rollout.embedded.hf_engine` holds
the engine's state behind them; :mod:`~megarl.rollout.embedded.scheduler` batches the queued
requests on one thread and applies pause / continue / abort between decoding steps;
:mod:`~megarl.rollout.embedded.generate` generates batches with a KV cache and SGLang's log-prob
semantics; :mod:`~megarl.rollout.embedded.weights` maps HF checkpoint names onto the model's
parameters for in-place updates. The client never imports this package: it only starts the
server (:class:`megarl.rollout.engine.Engine`) and speaks :mod:`megarl.rollout.protocol` to it.
"""
