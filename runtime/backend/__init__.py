"""Instance backends: the inference engines an instance runs behind the one Instance API.

``base.Backend`` is the port (submit, cancel, load, snapshots, drain, migration staging);
``transformers`` adapts sllm's own continuous-batching engine (``runtime.engine``), ``vllm``
runs vLLM's engine in the instance process. ``choice.choose_backend`` decides which one a
function's instance gets (pure).
"""
