//go:build tools

// Package tools pins the kube-apiserver that the test suite and `make dev`
// run, and the kube-controller-manager whose namespace controller the
// aggregated API's tests run (namespace deletion must complete while an
// APIService is registered). It is never compiled into opkeeper;
// `opkeeper.localcluster` builds the main packages named below into a
// user-level cache.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
