"""opkeeper: long-running asynchronous operations as Kubernetes resources.

The package is split by job: `models` (the resources, single source of the
CRD schema), `states` (the one state machine and the legacy vocabulary),
`controller` (kopf handlers), `gateway` (the legacy protocol facades) and
`localcluster` (a real kube-apiserver + etcd on loopback for dev and tests).
"""

GROUP = "opkeeper.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
