"""The gateway: legacy clients in front of Operations and ScheduledTasks.

A separate aiohttp process (``opkeeper gateway``) that turns legacy calls
into reads of a watch-fed cache and writes of the resources. It keeps no
operation state of its own (sessions are signed tokens), so any number of
replicas can run and a restart loses nothing.

Layers, outside in: :mod:`.server` (HTTP, limits, metrics) -> :mod:`.rpc`
(the XML-RPC call path: :mod:`.xmlrpc` decodes, a dialect's method runs, the
call is logged and the answer encoded) -> :mod:`.dialects` (one module per
dialect: :mod:`.dialects.gandi`, :mod:`.dialects.gocept`) -> :mod:`.service`
(the one domain service: tenancy, cache reads, resource writes) ->
:mod:`.cache` and the Kubernetes client. :mod:`.faults` holds each dialect's
error table, :mod:`.auth` turns API keys into sessions, :mod:`.calllog`
keeps the call log, :mod:`.records` translates gocept records.
"""
