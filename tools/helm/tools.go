//go:build tools

// Package tools pins the helm that the chart tests run. It is never compiled
// into opkeeper; opkeeper.localcluster builds the main package named below
// into the same user-level cache as kube-apiserver and etcd.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
