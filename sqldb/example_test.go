package sqldb_test

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/sqldb"
)

// A package embeds its migrations, one directory per dialect.
//
//go:embed testdata/migrations
var migrationFS embed.FS

// exampleDB opens a SQLite database in a temporary directory.
func exampleDB(ctx context.Context) (db *sqldb.DB, cleanup func()) {
	dir, err := os.MkdirTemp("", "sqldb-example-")
	if err != nil {
		log.Fatal(err)
	}
	db, err = sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "bank.db"), nil)
	if err != nil {
		log.Fatal(err)
	}
	return db, func() { db.Close(); os.RemoveAll(dir) }
}

func ExampleOpen() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "sqldb-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	// Or "postgres://user@host:5432/dbname".
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "service.db"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	fmt.Println(db.Dialect())
	// Output: sqlite
}

func ExampleDB_Migrate() {
	ctx := context.Background()
	db, cleanup := exampleDB(ctx)
	defer cleanup()

	migs, err := sqldb.LoadMigrations(migrationFS, "testdata/migrations/"+db.Dialect().String())
	if err != nil {
		log.Fatal(err)
	}
	if err := db.Migrate(ctx, "bank", migs); err != nil {
		log.Fatal(err)
	}
	var owner string
	var balance int
	if err := db.QueryRow(ctx, "SELECT owner, balance FROM accounts WHERE id = $1", 1).Scan(&owner, &balance); err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(migs), "migrations;", owner, balance)
	// Output: 2 migrations; bank 1000
}

func ExampleDB_InTx() {
	ctx := context.Background()
	db, cleanup := exampleDB(ctx)
	defer cleanup()
	migs, _ := sqldb.LoadMigrations(migrationFS, "testdata/migrations/"+db.Dialect().String())
	if err := db.Migrate(ctx, "bank", migs); err != nil {
		log.Fatal(err)
	}

	// Open an account with money from the bank: both rows or neither.
	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, "INSERT INTO accounts (id, owner, balance) VALUES ($1, $2, $3)", 2, "ada", 0); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO transfers (from_id, to_id, amount) VALUES ($1, $2, $3)", 1, 2, 100); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "UPDATE accounts SET balance = balance + CASE id WHEN $1 THEN -$3 ELSE $3 END WHERE id IN ($1, $2)", 1, 2, 100)
		return err
	})
	if err != nil {
		log.Fatal(err)
	}
	var ada int
	if err := db.QueryRow(ctx, "SELECT balance FROM accounts WHERE owner = $1", "ada").Scan(&ada); err != nil {
		log.Fatal(err)
	}
	fmt.Println("ada has", ada)
	// Output: ada has 100
}

// recordAudit stands for a Troupe call that takes a Tx, such as adding
// messages to the outbox.
func recordAudit(ctx context.Context, tx sqldb.Tx, what string) error {
	_, err := tx.Exec(ctx, "INSERT INTO accounts (id, owner) VALUES ($1, $2)", 99, what)
	return err
}

// An application that begins its own database/sql transaction hands it to
// Troupe with FromSQL: Troupe's rows commit with the application's.
func ExampleFromSQL() {
	ctx := context.Background()
	db, cleanup := exampleDB(ctx)
	defer cleanup()
	migs, _ := sqldb.LoadMigrations(migrationFS, "testdata/migrations/"+db.Dialect().String())
	if err := db.Migrate(ctx, "bank", migs); err != nil {
		log.Fatal(err)
	}

	var app *sql.DB = db.SQL() // the application's own handle to the database
	tx, err := app.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = 0 WHERE id = 1"); err != nil {
		log.Fatal(err)
	}
	if err := recordAudit(ctx, sqldb.FromSQL(tx, sqldb.SQLite), "emptied the bank"); err != nil {
		log.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		log.Fatal(err)
	}

	var n int
	if err := db.QueryRow(ctx, "SELECT COUNT(*) FROM accounts WHERE owner = $1", "emptied the bank").Scan(&n); err != nil {
		log.Fatal(err)
	}
	fmt.Println(n)
	// Output: 1
}
