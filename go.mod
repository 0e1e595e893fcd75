module github.com/maxpert/amqp-go

go 1.26
