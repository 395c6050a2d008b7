// Package quota is the contract of per-key quotas: the quota workflow's
// type name, its id (quota:<key id>) and inverse, its update, signal and
// query names and payloads, the limits' names and the error code its
// refusals carry. One workflow per key decides every admission of that key,
// whichever apiserver replica asks, so racing replicas cannot both take its
// last unit. The window (Window) is the pure arithmetic of the decision.
// No I/O here.
package quota
