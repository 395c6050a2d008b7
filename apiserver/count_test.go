package apiserver_test

import "go.temporal.io/api/workflowservice/v1"

func countReq(ns, q string) *workflowservice.CountWorkflowExecutionsRequest {
	return &workflowservice.CountWorkflowExecutionsRequest{Namespace: ns, Query: q}
}
