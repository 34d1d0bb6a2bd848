package sqldb

import "reflect"

// SameTx reports whether a and b run their statements in the same
// transaction: the Tx of one DB.InTx or DB.InGroupTx call, or Txs made by
// FromSQL or FromPgx of one transaction. Compare Txs with SameTx, not ==:
// a Tx's dynamic type need not be comparable. A Tx of a type of the
// caller's is the same only as itself, and only if it is a pointer.
func SameTx(a, b Tx) bool {
	switch x := a.(type) {
	case *pipeTx:
		y, ok := b.(*pipeTx)
		return ok && x == y
	case sqlTx:
		y, ok := b.(sqlTx)
		return ok && samePointer(x.q, y.q)
	case pgxTx:
		y, ok := b.(pgxTx)
		return ok && samePointer(x.q, y.q)
	case uncancelled:
		y, ok := b.(uncancelled)
		return ok && samePointer(x.t.q, y.t.q)
	}
	return samePointer(a, b)
}

// samePointer reports whether a and b are the same non-nil pointer.
func samePointer(a, b any) bool {
	if a == nil || b == nil {
		return false
	}
	ta := reflect.TypeOf(a)
	return ta == reflect.TypeOf(b) && ta.Kind() == reflect.Pointer && a == b
}
