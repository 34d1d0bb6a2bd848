// Package users is the Users domain of the sign-up example: it creates a
// user for each confirmed registration, on its own database, and tells
// Registration how that went.
//
// # Creating a user: two local steps
//
// Users consumes signup.registration.confirmed through its inbox. Step 1
// inserts the user, with the registration's id, in state CREATING, and in
// the same transaction adds to its outbox a message to itself that asks for
// step 2. Step 2, in a transaction of its own, provisions the user's login
// (an email address signs in one user only) after calling the
// Config.Provision hook, which stands for provisioning the account in
// another system. Between the two steps the user exists, partly created,
// and GET /users/{id} shows it CREATING.
//
// When step 2 succeeds the user becomes ACTIVE and [TypeCreated] is
// published. When it is refused for a business reason (the address is
// already another user's login, or Provision returned [Refuse]), the
// rollback sequence runs, in one transaction: the partly created user is
// deleted and [TypeCreationFailed] carries the reason to Registration, which
// undoes its own part. Any other failure is transient: the inbox rolls the
// step back and the broker delivers it again after a backoff.
//
// Every handler runs in the inbox's transaction, so a message delivered
// twice has its effect once, and each step checks the state it starts from
// (step 1 inserts only a missing user, step 2 acts only on a CREATING one),
// so a step that comes too late changes nothing. A message that cannot be
// decoded is dead-lettered with inbox.Permanent.
//
// # Messages
//
// Every message is a CloudEvents message from [Source] whose subject is the
// user's id. Handlers write their messages with the context the inbox gives
// them, which carries the message being handled (message.WithCause), so
// each message's correlation id is the registration's and its causation id
// the id of the message that caused it.
package users
