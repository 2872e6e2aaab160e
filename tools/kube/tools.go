//go:build tools

// Package tools pins the kube-apiserver that the test suite and `make dev`
// run. It is never compiled into opkeeper; `tools/build-binaries` builds the
// main package named below into a user-level cache.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
