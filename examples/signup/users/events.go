package users

// The messages Users publishes for other domains. Their topics, types and
// payloads are a contract: stable names, written out, never derived from Go
// type names. Every message's subject is the user's id, which is the
// registration's, and its correlation id that of the event that started the
// user's creation (the registration's id).
const (
	// Source is the CloudEvents source of every message Users publishes.
	Source = "/signup/users"

	// TopicUsers carries Users' events.
	TopicUsers = "signup.users"
	// TypeCreated says a user was created and is ACTIVE. Its data is a
	// [Created].
	TypeCreated = "signup.user.created"
	// TypeCreationFailed says a user's creation failed and was rolled back:
	// no user with that id exists. Its data is a [CreationFailed].
	TypeCreationFailed = "signup.user.creation-failed"

	// Group is the consumer group (and inbox consumer) in which Users
	// reads Registration's events.
	Group = "signup-users"
)

// Created is the data of a [TypeCreated] message.
type Created struct {
	UserID string `json:"user_id"`
	Email  string `json:"email"`
}

// CreationFailed is the data of a [TypeCreationFailed] message.
type CreationFailed struct {
	UserID string `json:"user_id"`
	// Reason says why, for people: it is shown on the registration.
	Reason string `json:"reason"`
}

// The second step of a user's creation is a message Users sends itself,
// through its outbox in the first step's transaction: step 2 then runs, in
// a transaction of its own, however the process fares between the two. The
// topic is Users' own; no other domain reads it.
const (
	topicProvisioning = "signup.users.provisioning"
	typeProvision     = "signup.user.provision-requested"
	groupProvisioning = "signup-users-provisioning"
)

// provision is the data of a typeProvision message.
type provision struct {
	UserID string `json:"user_id"`
}

// The event of Registration that Users consumes. It is copied here, not
// imported from package registration: the two domains share no code, as two
// services in two repositories would not, only the documented wire names.
const (
	topicRegistrations        = "signup.registrations"
	typeRegistrationConfirmed = "signup.registration.confirmed"
)

// registrationConfirmed is the part of a signup.registration.confirmed
// message's data that Users reads.
type registrationConfirmed struct {
	RegistrationID string `json:"registration_id"`
	Email          string `json:"email"`
	Name           string `json:"name"`
}
