variable "region" {
  description = "AWS region of the bucket."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Globally unique bucket name."
  type        = string
}

variable "expire_after_days" {
  description = "Expire cached KV blocks after this many days (null: never)."
  type        = number
  default     = 7
}

variable "engine_trusted_principal_arns" {
  description = "IAM principals allowed to assume the engine role (none: no role is created)."
  type        = list(string)
  default     = []
}

variable "gc_trusted_principal_arns" {
  description = "IAM principals allowed to assume the garbage-collector role (none: no role is created)."
  type        = list(string)
  default     = []
}
