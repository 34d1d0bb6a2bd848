package registration

// The messages Registration publishes. Their topics, types and payloads are
// the contract other domains read: stable names, written out, never derived
// from Go type names. Every message's subject and correlation id is the
// registration's id.
const (
	// Source is the CloudEvents source of every message Registration
	// publishes.
	Source = "/signup/registration"

	// TopicEmails carries the emails to send, for a mailer to deliver.
	TopicEmails = "signup.emails"
	// TypeConfirmationEmail asks for the confirmation email of a new
	// registration; its data is a [ConfirmationEmail].
	TypeConfirmationEmail = "signup.email.confirmation-requested"

	// TopicRegistrations carries Registration's events.
	TopicRegistrations = "signup.registrations"
	// TypeConfirmed says a registration's email address was confirmed: the
	// user may be created. Its data is a [RegistrationConfirmed].
	TypeConfirmed = "signup.registration.confirmed"

	// Group is the consumer group (and inbox consumer) in which Registration
	// reads Users' events.
	Group = "signup-registration"
)

// ConfirmationEmail is the data of a [TypeConfirmationEmail] message.
type ConfirmationEmail struct {
	RegistrationID string `json:"registration_id"`
	To             string `json:"to"`
	Name           string `json:"name"`
	// Token is the secret the recipient proves they read the email with.
	Token string `json:"token"`
	// ConfirmURL is where to POST {"token": Token}.
	ConfirmURL string `json:"confirm_url"`
}

// RegistrationConfirmed is the data of a [TypeConfirmed] message.
type RegistrationConfirmed struct {
	RegistrationID string `json:"registration_id"`
	Email          string `json:"email"`
	Name           string `json:"name"`
}

// The events of Users that Registration consumes. They are copied here, not
// imported from package users: the two domains share no code, as two
// services in two repositories would not, only the documented wire names.
const (
	topicUsers             = "signup.users"
	typeUserCreated        = "signup.user.created"
	typeUserCreationFailed = "signup.user.creation-failed"
)

// userCreationFailed is the part of a signup.user.creation-failed message's
// data that Registration reads.
type userCreationFailed struct {
	UserID string `json:"user_id"`
	Reason string `json:"reason"`
}
