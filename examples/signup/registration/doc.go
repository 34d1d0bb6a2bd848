// Package registration is the Registration domain of the sign-up example:
// it takes sign-ups, has their email address confirmed, and follows the
// creation of the user in the Users domain, which owns another database.
//
// # The flow
//
// POST /registrations creates a registration WAITING_FOR_CONFIRMATION with a
// random token, and in the same transaction adds the confirmation email
// ([TypeConfirmationEmail], carrying the token) to the outbox: the email is
// asked for if and only if the registration exists. Confirming with the
// token moves the registration to CONFIRMED and adds [TypeConfirmed] to the
// outbox, again in one transaction. Users creates the user with the
// registration's id and answers with signup.user.created, after which the
// registration is COMPLETED, or with signup.user.creation-failed {reason},
// after which it is WAITING_FOR_CONFIRMATION again with the reason in
// LastFailure: the rollback sequence of a choreography, where each domain
// undoes its own part on the other's event. Confirming again with the same
// token starts the creation again.
//
// No message is ever sent by a request handler or a consumer directly: each
// goes through the outbox in the transaction of the state change that causes
// it, and the Service's relay publishes it. Users' events are consumed
// through the inbox, so each applies once however often the broker delivers
// it, and every transition checks the state it starts from, so an event that
// arrives for a registration in another state changes nothing.
//
// # Messages
//
// Every message is a CloudEvents message from [Source] whose subject and
// correlation id are the registration's id, which Users' events carry on as
// their correlation id. The topics and types are constants of this package;
// the payloads are [ConfirmationEmail] and [RegistrationConfirmed].
package registration
