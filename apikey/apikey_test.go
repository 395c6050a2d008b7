package apikey

import "testing"

func TestHas(t *testing.T) {
	admin, inf, node := Bootstrap(), Principal{Scopes: []Scope{Inference}}, Principal{Scopes: []Scope{Node}, NodeID: "n1"}
	for _, c := range []struct {
		p    Principal
		s    Scope
		want bool
	}{
		{admin, Admin, true}, {admin, Inference, true}, {admin, Node, false},
		{inf, Inference, true}, {inf, Admin, false}, {inf, Node, false},
		{node, Node, true}, {node, Inference, false}, {node, Admin, false},
	} {
		if got := c.p.Has(c.s); got != c.want {
			t.Errorf("%v.Has(%s) = %v", c.p.Scopes, c.s, got)
		}
	}
	if !Scope("node").Valid() || Scope("root").Valid() {
		t.Error("Valid")
	}
	if got := (Actor{KeyID: "k1", KeyName: "ci"}).String(); got != "ci (k1)" {
		t.Error(got)
	}
}
