"""The gateway: legacy XML-RPC clients in front of Operations and ScheduledTasks.

A separate aiohttp process (``opkeeper gateway``) that turns XML-RPC calls
into reads of a watch-fed cache and writes of the resources. It keeps no
operation state of its own, so any number of replicas can run and a restart
loses nothing but login sessions.

Layers, outside in: :mod:`.server` (HTTP, limits, metrics) ->
:mod:`.xmlrpc` (the hardened codec) -> :mod:`.dispatch` (method table of the
Gandi and gocept dialects, thin facades) -> :mod:`.service` (the one domain
service: tenancy, cache reads, resource writes) -> :mod:`.cache` and the
Kubernetes client. :mod:`.faults` maps every error to one stable faultCode,
:mod:`.auth` turns API keys into sessions, :mod:`.calllog` keeps the gocept
call log.
"""
