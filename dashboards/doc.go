// Package dashboards holds Grafana dashboards and Prometheus config; its test keeps them true to the metrics the code exports.
package dashboards
