"""How the work of an Operation runs: one module per executor kind.

The controller never knows what a Job or a webhook is: it calls
:meth:`base.Executor.start` when an attempt may start, :meth:`base.Executor.poll`
while it runs and :meth:`base.Executor.cancel` to stop it, and turns the
returned :class:`base.Outcome` into a state transition. Each executor makes
its start idempotent per attempt (a deterministic Job name, an idempotency
key), which is what makes a start exactly-once across controller restarts.
"""
