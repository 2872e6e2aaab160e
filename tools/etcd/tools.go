//go:build tools

// Package tools pins the etcd that the local control plane runs. It is never
// compiled into opkeeper; `tools/build-binaries` builds the main package named
// below into a user-level cache.
package tools

import _ "go.etcd.io/etcd/server/v3"
