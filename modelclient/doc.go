// Package modelclient is the client side of staging and GC: the calls the
// apiserver (and later the pool and inference paths) make to stage a model
// onto a node, list what a node holds or is fetching, and run GC.
package modelclient
