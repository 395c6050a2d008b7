package node

import (
	"reflect"
	"testing"
)

// Same compares every field: one added to LinkPool and left out of Same
// would let the link's version stay put while it changed.
func TestLinkPoolSameSeesEveryField(t *testing.T) {
	var base LinkPool
	if !base.Same(base) {
		t.Fatal("a pool is the same as itself")
	}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		p := base
		f := reflect.ValueOf(&p).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Int, reflect.Int64:
			f.SetInt(1)
		case reflect.Uint64:
			f.SetUint(1)
		case reflect.Slice:
			f.Set(reflect.Append(f, reflect.Zero(f.Type().Elem())))
		default:
			t.Fatalf("field %s: kind %s not covered by this test", typ.Field(i).Name, f.Kind())
		}
		if base.Same(p) || p.Same(base) {
			t.Errorf("Same misses a change of %s", typ.Field(i).Name)
		}
	}
}
