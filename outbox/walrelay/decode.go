package walrelay

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
)

// row is one outbox row on its way to the broker.
type row struct {
	seq        int64
	topic      string
	msg        *message.Message
	commitTime time.Time
}

// relation is what the relay needs of a table's RelationMessage: whether it is
// the outbox table and where its columns are.
type relation struct {
	outbox                   bool
	seqCol, topicCol, envCol int
	idCol                    int // -1 if the table has none
}

func newRelation(m *pglogrepl.RelationMessage) (relation, error) {
	if m.RelationName != outbox.Table {
		return relation{}, nil
	}
	rel := relation{outbox: true, seqCol: -1, topicCol: -1, envCol: -1, idCol: -1}
	for i, c := range m.Columns {
		switch c.Name {
		case "seq":
			rel.seqCol = i
		case "topic":
			rel.topicCol = i
		case "envelope":
			rel.envCol = i
		case "id":
			rel.idCol = i
		}
	}
	if rel.seqCol < 0 || rel.topicCol < 0 || rel.envCol < 0 {
		return relation{}, fmt.Errorf("walrelay: table %s.%s lacks a seq, topic or envelope column", m.Namespace, m.RelationName)
	}
	return rel, nil
}

// insertRow decodes an InsertMessage of the outbox table.
func (rel relation) insertRow(m *pglogrepl.InsertMessage) (row, error) {
	cols := m.Tuple.Columns
	if n := len(cols); rel.seqCol >= n || rel.topicCol >= n || rel.envCol >= n {
		return row{}, fmt.Errorf("walrelay: insert into %s has %d columns, fewer than its relation", outbox.Table, n)
	}
	for _, c := range []*pglogrepl.TupleDataColumn{cols[rel.seqCol], cols[rel.topicCol], cols[rel.envCol]} {
		if c.DataType != pglogrepl.TupleDataTypeText {
			return row{}, fmt.Errorf("walrelay: insert into %s: column in format %q, want text", outbox.Table, c.DataType)
		}
	}
	return decodeRow(cols[rel.seqCol].Data, cols[rel.topicCol].Data, cols[rel.envCol].Data)
}

// idOf returns the text of the id column of an outbox insert, or "" when
// the relation has no such column.
func (rel relation) idOf(m *pglogrepl.InsertMessage) string {
	if rel.idCol < 0 || rel.idCol >= len(m.Tuple.Columns) {
		return ""
	}
	return string(m.Tuple.Columns[rel.idCol].Data)
}

// decodeRow decodes the text forms of seq, topic and envelope (bytea in hex
// output) into a row.
func decodeRow(seqText, topic, envText []byte) (row, error) {
	seq, err := strconv.ParseInt(string(seqText), 10, 64)
	if err != nil {
		return row{}, fmt.Errorf("walrelay: outbox seq %q: %w", seqText, err)
	}
	hexEnv, ok := bytes.CutPrefix(envText, []byte(`\x`))
	if !ok {
		return row{}, fmt.Errorf("walrelay: outbox row %d: envelope not in bytea hex output", seq)
	}
	env := make([]byte, hex.DecodedLen(len(hexEnv)))
	if _, err := hex.Decode(env, hexEnv); err != nil {
		return row{}, fmt.Errorf("walrelay: outbox row %d: envelope: %w", seq, err)
	}
	return decodeEnvelope(seq, string(topic), env)
}

// decodeEnvelope makes a row of an outbox row's seq, topic and envelope.
func decodeEnvelope(seq int64, topic string, env []byte) (row, error) {
	msg, err := outbox.DecodeEnvelope(env)
	if err != nil {
		return row{}, fmt.Errorf("walrelay: outbox row %d: %w", seq, err)
	}
	return row{seq: seq, topic: topic, msg: msg}, nil
}
