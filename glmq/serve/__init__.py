"""``glmq serve``: GLM-Image behind OpenAI's image API, with a queue that batches concurrent requests.

:mod:`~glmq.serve.api` checks requests, :mod:`~glmq.serve.batcher` queues and runs them on the pipeline,
:mod:`~glmq.serve.metrics` counts, :mod:`~glmq.serve.app` is the HTTP application and
:mod:`~glmq.serve.server` runs it. Importing this package imports none of them: ``glmq`` and its other
commands never load the web stack.
"""
